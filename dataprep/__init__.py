"""Offline data preparation: public datasets turned into sample posts and members."""
