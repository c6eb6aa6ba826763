"""Labeling: revisers turn rejected responses into minimal edits; edit operations label every token."""
