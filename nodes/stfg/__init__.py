"""STFG sampler guidance: node, attention-map stage and the post-CFG update.
"""
