"""Diverse prompts for parity tests: lengths from 1 to ~300 tokens, prose, code, lists, chat."""

PARAGRAPH = (
    "The history of thermodynamics is a fundamental strand in the history of physics, the history "
    "of chemistry, and the history of science in general. Owing to the relevance of thermodynamics "
    "in much of science and technology, its history is finely woven with the developments of "
    "classical mechanics, quantum mechanics, magnetism, and chemical kinetics. "
)

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Translate to French: The weather is nice today.",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is a GPU?<|im_end|>\n<|im_start|>assistant\n",
    "Q: Why is the sky blue?\nA:",
    "import numpy as np\nx = np.linspace(0, 1, 10)\n",
    "List three fruits:\n-",
    "The mitochondria is",
    "Ünïcödé tëxt and émojis 🌡️🔥 are",
    PARAGRAPH + "Summarize the paragraph above in one sentence:",
    PARAGRAPH * 3 + "The main point is",
    PARAGRAPH * 5 + "In conclusion,",
    "SELECT name, COUNT(*) FROM users GROUP BY",
]
