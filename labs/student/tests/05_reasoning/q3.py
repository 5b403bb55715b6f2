OK_FORMAT = True

test = {   'name': 'q3',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q3', 'llmlab.reasoning.group_advantages'):\n"
                                               '...     adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2]), 4)\n'
                                               '>>> assert adv.shape == (8,)\n'
                                               '>>> assert abs(adv[0].item() - 1.5) < 0.001 and abs(adv[1].item() + 0.5) < 0.001\n'
                                               '>>> assert adv[4:].abs().max().item() < 0.01\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
