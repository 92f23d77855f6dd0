"""The acquisition-side daemon: protocol, server, pipeline, writer, publisher, client, CLI."""
