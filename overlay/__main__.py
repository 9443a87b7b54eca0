from overlay.cli_base import main

main()
