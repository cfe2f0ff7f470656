"""One-copy staging of a step's host arrays: every array comes back with its values,
dtype and shape, whatever the mix of sizes and alignments."""

import numpy as np
import torch

from ondo.engine.staging import to_device


def test_packed_arrays_come_back_as_they_went():
    arrays = [np.arange(5, dtype=np.int64) * 7 - 3,
              np.arange(6, dtype=np.int32).reshape(2, 3) + 100,
              np.array([1.5, -2.25, 3.0], dtype=np.float32),  # 12 bytes: the next one is realigned
              np.array([], dtype=np.int64),
              np.array([True, False, True]),
              np.array([2**62 + 1, -(2**40)], dtype=np.int64)]
    out = to_device(arrays, torch.device("cpu"), packed=True)
    assert len(out) == len(arrays)
    for a, t in zip(arrays, out, strict=True):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)
    # One buffer: the views share it, each at a 16-byte aligned offset (Triton specializes on it).
    base = out[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in out)
    assert all((t.data_ptr() - base) % 16 == 0 for t in out)


def test_a_non_contiguous_array_is_packed_by_value():
    table = np.arange(20, dtype=np.int32).reshape(4, 5)[:, 1:4]
    (t,) = to_device([table], torch.device("cpu"), packed=True)
    assert np.array_equal(t.numpy(), table)


def test_unpacked_on_cpu_is_the_arrays_own_memory():
    a = np.arange(4, dtype=np.int64)
    (t,) = to_device([a], torch.device("cpu"))
    a[0] = 9
    assert int(t[0]) == 9
