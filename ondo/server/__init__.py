"""ondo.server"""
