from bench.run import main

if __name__ == "__main__":  # spawned helpers (tests/throttle.py) import this module again
    main()
