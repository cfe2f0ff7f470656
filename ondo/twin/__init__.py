"""ondo.twin"""
