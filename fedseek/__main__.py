from fedseek.platform.cli.main import main

main()
