"""ondo.agent"""
