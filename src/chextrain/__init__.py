"""chextrain: chest x-ray classifiers that work on digital x-rays and on phone photos of them."""

__version__ = "0.1.0"
