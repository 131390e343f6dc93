"""npcapserve: the sensor's HTTPS API (packets, conversations, traffic volume, status, metrics).

It sits on the extraction pipeline and the extraction service's policy (extract/), so an
analyst gets the same packets, under the same rules, over HTTPS as at the sensor's shell.
"""
