"""pcapvault.recorder"""
