"""Guest side of boxvm: the bundle that boots, the agent inside it, and the protocol between."""
