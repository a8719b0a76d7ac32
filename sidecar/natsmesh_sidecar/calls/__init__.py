"""One mesh call from each side: the caller's (outbound) and the callee's (inbound).

Here an edge, the policy and the transport meet; nothing below imports this.
"""
