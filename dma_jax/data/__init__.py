"""Data: tokenization, domains, on-device sampling (sweep) and the Grain mixer (CPT)."""
