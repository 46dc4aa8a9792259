"""Generic transformer and set-prediction pieces shared by the query-based heads.

`attention`: Mask2Former-style sub-layers on `nn.MultiheadAttention` and the masked-attention rule;
`mlp`: the mask-embedding MLP; `position`: the DETR sine position embedding; `matching`: the
Hungarian matcher, point sampling and the point-sampled mask losses. Used by SINE's M-Former
(heads/mformer.py) and Mask2Former.
"""
