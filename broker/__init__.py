"""Kafka infrastructure both sides use: the embedded broker and topic administration.

producer/ and worker/ import from here; nothing here imports them.
"""
