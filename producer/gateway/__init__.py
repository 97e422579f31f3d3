"""The HTTP gateway: authenticated, OpenAI-compatible entry point in front of the Kafka topics."""
