"""Planning: from options to a Plan (sources resolved, facts read, one Job per component). No torch here."""
