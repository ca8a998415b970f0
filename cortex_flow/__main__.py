from cortex_flow.cli.main import main

main()
