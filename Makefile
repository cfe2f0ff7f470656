.PHONY: serve test lint install

install:
	scripts/install.sh

serve: install
	ondo serve

test:
	scripts/install.sh test
	python3 -m ruff check ondo tests bench
	python3 -m pytest -q

lint:
	python3 -m ruff check ondo tests bench
