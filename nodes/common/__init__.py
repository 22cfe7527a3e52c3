"""What every node shares: the host's feature detection, errors and input checks, model folders, model
families (dit_layout), the step's sigma and per-sampling constants. Imports nothing else of nodes/.
"""
