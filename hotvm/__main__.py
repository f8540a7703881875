from hotvm.cli import main

main()
