from chextrain.cli import main

main()
