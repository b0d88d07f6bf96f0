"""Reading and checking user data: stimuli, ratings, brain data, FindingEmo, splits.

Names the result tables reserve for derived rows, so user data may not use them:
``subject`` ``group`` (mean over subjects; allowed only as the single subject of a group-level
brain RDM) and ``group_rdm`` (vs the group-mean RDM), and ``condition`` ``all`` (the whole set).
"""

GROUP_SUBJECT = "group"
GROUP_RDM_SUBJECT = "group_rdm"
ALL_CONDITION = "all"
