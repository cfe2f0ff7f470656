"""Requests, block manager, scheduler, model runner and the engine loop."""
