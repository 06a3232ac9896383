"""vLLM as a second engine behind the node: its server process, the client, the adapters it holds."""
