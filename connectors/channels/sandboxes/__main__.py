from connectors.channels.sandboxes import main

main()
