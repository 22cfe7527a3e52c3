"""Weight files: safe reading (safetensors, weights_only torch files, bounded walks), dtypes and errors, the
manifest, downloads and what to tell a user, and where the pack may write.
"""
