"""``python -m image_transfer ...``: the same as the ``image-transfer`` command."""

from image_transfer.jobs.cli import main

if __name__ == "__main__":
    main()
