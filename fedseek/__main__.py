from fedseek.platform.cli import main

main()
