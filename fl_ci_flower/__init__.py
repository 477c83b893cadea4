"""What the Flower ServerApp and ClientApp share: the message protocol (protocol.py)."""
