"""The extract stage: images and prompts in, the DiT run once per image, features into the store."""
