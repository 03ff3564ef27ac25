from chextrain.cli import main

if __name__ == "__main__":  # not when a spawned process (a slot) imports it as its parent's main
    main()
