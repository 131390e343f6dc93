"""pcapvault.extract"""
