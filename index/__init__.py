"""pcapvault.index"""
