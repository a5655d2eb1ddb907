"""The media timeline: what plays at each media time, and the files it is written to."""
