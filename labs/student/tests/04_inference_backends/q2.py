OK_FORMAT = True

test = {   'name': 'q2',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q2', 'llmlab.infer.top_p_filter', 'llmlab.infer.warp_logits', 'llmlab.infer.sample_next', "
                                               "'transformers.TopPLogitsWarper'):\n"
                                               '...     kept = torch.isfinite(top_p(torch.log(torch.tensor([0.1, 0.5, 0.25, 0.15])), 0.7))\n'
                                               '>>> assert kept.tolist() == [False, True, True, False]\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
