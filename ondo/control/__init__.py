"""ondo.control"""
