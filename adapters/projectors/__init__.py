"""Projectors: the networks that turn an identity (face embeddings, image features) into tokens or keys and
values (IP-Adapter family, InstantID, PuLID, PVA, KV-mixed encoders, Omni-ID's set encoder).
"""
