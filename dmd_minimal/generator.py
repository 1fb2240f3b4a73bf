"""The one-step generator G(z; class) = D_G(sigma_max z; sigma_max, class)   (DMD §3.1).

D_G starts as a copy of the teacher, so before any training G(z) is the teacher's one-step
prediction from pure noise: the (blurry) mean of the data. DMD then trains D_G's weights.
"""
import torch.nn as nn


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser, sigma_max=80.0):
        super().__init__()
        self.denoiser = denoiser    # a Denoiser, initialised as a copy of the teacher
        self.sigma_max = sigma_max  # the noise level the generator "denoises" from

    def forward(self, z, class_labels=None):
        return self.denoiser(self.sigma_max * z, self.sigma_max, class_labels)
