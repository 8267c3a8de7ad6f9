"""Video and image I/O, real footage that ships in packages, and the curated dataset."""
