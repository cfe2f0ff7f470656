"""ondo.console"""
