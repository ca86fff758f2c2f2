"""alignment: train LMs to follow human preferences with control tokens and preference-aware objectives."""
