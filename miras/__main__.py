from miras.cli import main

main()
