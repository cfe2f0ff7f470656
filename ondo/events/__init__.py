"""ondo.events"""
