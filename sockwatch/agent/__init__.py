"""The long-running agent and the local protocol front ends use to query it."""
