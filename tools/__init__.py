"""pcapvault.tools"""
