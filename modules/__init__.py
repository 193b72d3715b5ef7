"""Every nn.Module of lumrec."""
