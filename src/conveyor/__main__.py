"""`python -m conveyor ...`: the same command line as `conveyor ...`."""

from conveyor.cli.main import main

if __name__ == "__main__":
    main()
