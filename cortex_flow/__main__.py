from cortex_flow.cli import main

main()
