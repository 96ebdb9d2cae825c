"""The SFT algorithm, one file per concept, in the order data flows through them."""
